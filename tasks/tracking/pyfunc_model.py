"""The MLflow pyfunc of a learner version, logged as *models from code*: loading it runs this file
instead of unpickling an object, and rebuilds the method from its safetensors state.

``mlflow.pyfunc.load_model(uri).predict(pixels)`` takes float32 pixels (B, 3, H, W) in [0, 1] and
returns the predicted class names. The backbone's weights are not in the model (only the learned
state is): they come from timm's pretrained loading or the file named in the model config.
"""

from __future__ import annotations

import warnings

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

# Defining a PythonModel without type hints makes MLflow suggest them; the logged signature validates input.
warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")


class StrataClassifier(PythonModel):
    """Predicts class names with a Strata method restored from its state files."""

    def load_context(self, context) -> None:
        from strata.tasks.training.restore import restore_method

        self.method = restore_method(context.artifacts["state"], (context.model_config or {}).get("weights"))
        self.class_names = np.array(self.method.class_names)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        pixels = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            scores = self.method(pixels.to(self.method.device))
        return self.class_names[scores.argmax(dim=1).cpu().numpy()]


mlflow.models.set_model(StrataClassifier())
