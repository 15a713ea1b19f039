"""The file MLflow runs to rebuild a logged tlray model ("models from code"; see
`tlray.serving` for what the model does and `tlray.logged_model` for how it is logged)."""

import mlflow

from tlray.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
