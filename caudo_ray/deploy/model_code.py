"""MLflow's models-from-code entry: MLflow copies this file into the model and runs it to get the model object,
so loading the model runs this code instead of unpickling a stored object."""

from mlflow.models import set_model

from caudo_ray.deploy.pyfunc import SegmenterModel

set_model(SegmenterModel())
