"""The trained model as MLflow serves it: a pyfunc that takes raw images (`pyfunc`), how it is
logged (`log_model`), and `tlray predict`, a thin client of it (`predict`). Kept import-free:
this package's pyfunc ships inside every logged model."""
