"""CompVis config target ``ldm.lr_scheduler.LambdaLinearScheduler`` (sd-v1 training configs name
it); the schedule lives in ``core.schedules``."""
from core.schedules import LambdaLinearScheduler  # noqa: F401
