/* The public header is plain C: this file is compiled as strict C99 with
 * -Wpedantic -Werror, uses every type and initialiser macro, and links
 * against libgmtk. */
#include <gmtk/gmtk.h>

#include <stdio.h>
#include <string.h>

int main(void) {
  int version = 0;
  gmtkHandleConfig_t handle_config = GMTK_HANDLE_CONFIG_INIT;
  gmtkPlanConfig_t plan_config = GMTK_PLAN_CONFIG_INIT;
  gmtkStepArgs_t args = GMTK_STEP_ARGS_INIT;
  gmtkGroupConfig_t group;
  gmtkTensor_t tensor;
  gmtkHandle_t handle = NULL;
  gmtkPlan_t plan = NULL;
  gmtkStream_t stream = NULL;
  float grad[4] = {1.0f, -4.0f, 2.0f, 0.5f};
  float threshold = 0.0f;
  int64_t kept = 0;
  size_t workspace_bytes = 0;
  unsigned char workspace[4096];

  if (gmtkGetVersion(&version) != GMTK_SUCCESS || version != GMTK_VERSION) return 1;
  handle_config.backend = GMTK_BACKEND_CPU_REFERENCE;
  if (gmtkHandleCreate(&handle, &handle_config) != GMTK_SUCCESS) return 2;
  if (gmtkGroupConfigInit(&group, GMTK_OPTIMIZER_SGD) != GMTK_SUCCESS) return 3;
  group.mask_ratio = 0.5;

  memset(&tensor, 0, sizeof(tensor));
  tensor.numel = 4;
  tensor.grad_dtype = GMTK_FLOAT32;
  tensor.grad = grad;
  tensor.param_dtype = GMTK_FLOAT32;
  plan_config.groups = &group;
  plan_config.num_groups = 1;
  plan_config.tensors = &tensor;
  plan_config.num_tensors = 1;
  if (gmtkPlanCreate(handle, &plan_config, &plan) != GMTK_SUCCESS) return 4;
  if (gmtkPlanGetWorkspaceSize(plan, &workspace_bytes) != GMTK_SUCCESS || workspace_bytes > sizeof(workspace)) return 5;

  args.thresholds = &threshold;
  args.kept_counts = &kept;
  if (gmtkMaskGradients(plan, &args, workspace, workspace_bytes, stream) != GMTK_SUCCESS) return 6;
  /* ratio 0.5 of 4 keeps the 2 largest: |-4| and |2|. */
  if (threshold != 2.0f || kept != 2 || grad[0] != 0.0f || grad[1] != -4.0f || grad[3] != 0.0f) return 7;

  if (gmtkStep(NULL, &args, workspace, workspace_bytes, stream) != GMTK_ERROR_INVALID_ARGUMENT) return 8;
  if (strstr(gmtkGetLastErrorMessage(), "plan") == NULL) return 9;
  printf("gmtk %d from C: %s\n", version, gmtkGetErrorString(GMTK_SUCCESS));
  gmtkPlanDestroy(plan);
  gmtkHandleDestroy(handle);
  return 0;
}
