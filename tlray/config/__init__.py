"""The settings of a run: dataclasses per concern (settings.py), resolved from defaults, a
YAML file and `--section.key=value` overrides (resolve.py), named augmentation presets, and
the jobs' recipes (recipes/, YAML). Torch-free, so that `--help` and `--print-config`
answer at once."""

from tlray.config.resolve import (
                                  copy,
                                  dump_yaml,
                                  from_dict,
                                  from_plain,
                                  load,
                                  parse_value,
                                  validate,
                                  with_overrides,
)
from tlray.config.settings import (
                                  CHAMPION_METRICS,
                                  MONITORS,
                                  Config,
                                  DataConfig,
                                  ModelConfig,
                                  OptimConfig,
                                  ScalingConfig,
                                  TrackingConfig,
                                  TrainConfig,
                                  TuneConfig,
)

__all__ = ["CHAMPION_METRICS", "MONITORS", "Config", "DataConfig", "ModelConfig", "OptimConfig",
           "ScalingConfig", "TrackingConfig", "TrainConfig", "TuneConfig", "copy", "dump_yaml",
           "from_dict", "from_plain", "load", "parse_value", "validate", "with_overrides"]
