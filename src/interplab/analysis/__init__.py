"""Which parts of a model do the work: tasks and metrics, ablation, activation and attribution
patching, the logit lens, direct logit attribution and embedding arithmetic.

    from interplab.analysis import ioi_task, patch_residual, ablation_sweep, logit_lens
    task = ioi_task(16, tokenizer=model.tokenizer)
    grid = patch_residual(model, task, columns="marks")
    grid.save("runs/ioi", "resid")
"""

from interplab.analysis.ablation import (Direction, DirectionAblate, ablate, ablated_metric, ablation_sweep,
                                         sweep_summary)
from interplab.analysis.attention import AttentionPattern, attention_pattern
from interplab.analysis.cells import Target, capture_run, final_logits, run_cells
from interplab.analysis.attribution import activation_gradients, compare_grids
from interplab.analysis.components import Component, parse_component, parse_layers
from interplab.analysis.embedding import embedding_arithmetic, nearest_tokens, parse_expression, vocab_projection
from interplab.analysis.lens import (DLAResult, LensResult, direct_logit_attribution, final_norm, lens_logits,
                                     logit_lens)
from interplab.analysis.patching import (PatchScore, PatchSetup, patch_components, patch_heads, patch_layers,
                                         patch_residual, patch_sites, prepare)
from interplab.analysis.report import Grid
from interplab.analysis.tasks import EncodedTask, Task, ioi_task, load_facts, score

__all__ = [
    "AttentionPattern", "attention_pattern", "Component", "DLAResult", "Direction", "DirectionAblate", "EncodedTask", "Grid", "LensResult", "PatchScore",
    "PatchSetup", "Target", "Task", "capture_run", "final_logits", "prepare", "run_cells", "ablate", "ablated_metric", "ablation_sweep", "activation_gradients", "compare_grids",
    "direct_logit_attribution", "embedding_arithmetic", "final_norm", "ioi_task", "lens_logits", "load_facts",
    "logit_lens", "nearest_tokens", "parse_component", "parse_expression", "parse_layers", "patch_components",
    "patch_heads", "patch_layers", "patch_residual", "patch_sites", "score", "sweep_summary", "vocab_projection",
]
