"""Train, test and predict over a dataset: the loop every method shares, behind the CLI and the Python API.

A *run* is a folder with one self-describing model file per trained model (``<category>.safetensors``, or
``unified.safetensors`` for a model of all categories) and a ``run.json`` index. Thresholds are calibrated at the
end of training on held-out nominal samples and stored in the model file, so a run folder is all a line PC needs.
"""

from mmiad.engine.evaluation import evaluate_predictions, evaluate_run
from mmiad.engine.predicting import RunModels, input_records, override_image_threshold
from mmiad.engine.runs import (
    RUN_INDEX,
    UNIFIED,
    Log,
    calibration_split,
    extend_run,
    model_for,
    quiet,
    run_models,
    select_few_shot,
    served_categories,
    serving_key,
    train_run,
    write_run_index,
)
from mmiad.engine.trained import (
    TrainedModel,
    apply_thresholds,
    build_model,
    calibrate_model,
    fit_and_calibrate,
    fit_fallback,
    load_trained,
    predict_records,
    save_trained,
)

__all__ = [
    "RUN_INDEX",
    "UNIFIED",
    "Log",
    "RunModels",
    "TrainedModel",
    "apply_thresholds",
    "build_model",
    "calibrate_model",
    "calibration_split",
    "evaluate_predictions",
    "evaluate_run",
    "extend_run",
    "fit_and_calibrate",
    "fit_fallback",
    "input_records",
    "load_trained",
    "model_for",
    "override_image_threshold",
    "predict_records",
    "quiet",
    "run_models",
    "save_trained",
    "select_few_shot",
    "served_categories",
    "serving_key",
    "train_run",
    "write_run_index",
]
