"""course_lib: the teaching library of the efficient fine-tuning course.

Sub-packages, one topic each (the notebook that derives each piece is named in its docstring):

- `course_lib.config`   the COURSE_FAST switch and paths
- `course_lib.methods`  get_peft_model(model, config): one entry point for every method
- `course_lib.report`   PEFTReport: the report every method returns
- `course_lib.transformer` attention and transformer blocks from scratch (BERT and pre-norm)
- `course_lib.peft`     LoRA, adapters, prefix/prompt tuning, BitFit, (IA)^3 and their injection
- `course_lib.meters`   trainable parameters, activation memory, activation density
- `course_lib.text`     the packaged MiniLM, the generated text task, GLUE-format loaders
- `course_lib.train`    a small seeded training / evaluation loop
- `course_lib.points`   point-cloud ops, open3d interop, the shape data, the tiny Point-MAE
- `course_lib.point_peft` memory bank, Point-prior Prompt, Geometry-aware Adapter (Point-PEFT),
                        and the experiments of notebook 16
- `course_lib.deft`     activation-density meter, density loss, sparse second MLP projection (DEFT)
- `course_lib.meft`     reversible couplings, the custom backward, MEFT1/2/3 from a BERT (MEFT)
- `course_lib.results`, `course_lib.download`  atomic results JSON, checked resumable downloads
- `course_lib.widgets`  update functions behind the notebooks' interactive widgets

One shape for every method (the conventions, as Hugging Face peft's `PeftConfig` /
`get_peft_model` family has them):

- **A config dataclass per method**: `LoRAConfig`, `AdapterConfig`, `PrefixTuningConfig`,
  `PromptTuningConfig`, `BitFitConfig`, `IA3Config` (`course_lib.peft`), `PointPEFTConfig`
  (`course_lib.point_peft`), `MEFTConfig` (`course_lib.meft`), `DEFTConfig` (`course_lib.deft`:
  a training loss rather than a change of the model, `DEFTLoss.from_config(config)`).
- **One entry point**: `course_lib.get_peft_model(model, config) -> (model, report)` (module
  `course_lib.methods`); each method's own function (`inject_peft`, `point_peft`, `meft`) is the
  same thing for one method.
- **In place, except where the method rebuilds the model**: PEFT methods and Point-PEFT change
  (freeze, wrap) the model they are given, which is the model to train; MEFT builds a new
  reversible model and leaves the given one untouched. `report.in_place` says which.
- **One report**: `course_lib.report.PEFTReport` (method, trainable, total, trainable_pct,
  changed, parts, in_place, config); methods add their own details in a subclass.
- **Module patterns** (`target_modules`, `trainable_modules`) follow peft: a string is a regex
  that must match the whole dotted name, a list matches name endings (`course_lib.peft.matching`).
  peft's own option names (`lora_alpha`, `lora_dropout`, `modules_to_save`) and config objects
  are accepted; `merge_and_unload` and `unload` return the model as peft's do.
- **Saving**: `course_lib.peft.save_adapter` / `load_adapter` write and read peft's format.

Sub-packages are imported on demand (`import course_lib.peft`), so that importing course_lib
itself stays cheap; `course_lib.get_peft_model` imports its module when first used.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "get_peft_model":
        from course_lib.methods import get_peft_model

        return get_peft_model
    raise AttributeError(f"module 'course_lib' has no attribute {name!r}")
