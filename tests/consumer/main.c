/* Links against an installed gmtk and runs one masked SGD step on the CPU
 * reference backend. */
#include <gmtk/gmtk.h>

#include <stdio.h>

static int near(float actual, float expected) {
  const float difference = actual - expected;
  return difference < 1e-6f && difference > -1e-6f;
}

int main(void) {
  gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
  gmtkPlanConfig_t plan_config = GMTK_PLAN_CONFIG_INIT;
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  gmtkGroupConfig_t group;
  gmtkTensor_t tensor = {0, 4, GMTK_FLOAT32, NULL, GMTK_FLOAT32, NULL, NULL, NULL, NULL, NULL};
  gmtkHandle_t handle = NULL;
  gmtkPlan_t plan = NULL;
  float grad[4] = {0.1f, -0.4f, 0.2f, 0.3f};
  float param[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  gmtkStatus_t status;

  handle_config.backend = GMTK_BACKEND_CPU_REFERENCE;
  gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_SGD);
  group.lr = 1.0;
  group.mask_ratio = 0.5;
  tensor.grad = grad;
  tensor.param = param;
  plan_config.groups = &group;
  plan_config.num_groups = 1;
  plan_config.tensors = &tensor;
  plan_config.num_tensors = 1;
  plan_config.flags = GMTK_PLAN_ALLOCATE_WORKSPACE;

  status = gmtkHandleCreate(&handle, &handle_config);
  if (status == GMTK_SUCCESS) status = gmtkPlanCreate(handle, &plan_config, &plan);
  if (status == GMTK_SUCCESS) status = gmtkStep(plan, &args, NULL, 0, NULL);
  if (status != GMTK_SUCCESS) {
    fprintf(stderr, "gmtk: %s: %s\n", gmtkGetErrorString(status), gmtkGetLastErrorMessage());
    return 1;
  }
  /* Kept: |-0.4| and |0.3|; masked entries keep their parameter (SGD, no decay). */
  printf("params after one masked step: %g %g %g %g\n", param[0], param[1], param[2], param[3]);
  gmtkPlanDestroy(plan);
  gmtkHandleDestroy(handle);
  return near(param[0], 1.0f) && near(param[1], 1.4f) && near(param[2], 1.0f) && near(param[3], 0.7f) ? 0 : 1;
}
