"""course_lib: the teaching library of the efficient fine-tuning course.

Sub-packages, one topic each (the notebook that derives each piece is named in its docstring):

- `course_lib.config`   the COURSE_FAST switch and paths
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

Sub-packages are imported on demand (`import course_lib.peft`), so that importing course_lib
itself stays cheap.
"""

__version__ = "0.1.0"
