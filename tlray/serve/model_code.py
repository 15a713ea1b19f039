"""The file MLflow runs to rebuild a logged tlray model ("models from code"; see
`tlray.serve.pyfunc` for what the model does and `tlray.serve.log_model` for how it is logged)."""

import mlflow

from tlray.serve.pyfunc import ImageClassifier

mlflow.models.set_model(ImageClassifier())
