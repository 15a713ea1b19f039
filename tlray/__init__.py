"""tlray: distributed transfer learning with timm, Ray Train/Tune/Data and MLflow."""

__version__ = "0.1.0"
