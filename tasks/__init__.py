"""The steps flows are made of; every side effect (files, DVC, MLflow, SQL, ONNX) lives here."""
