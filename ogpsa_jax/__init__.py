"""ogpsa_jax: Orthogonal Gradient Projection for Safety Alignment, in JAX.

Public names are re-exported here; everything else is private to its module. Subpackages:
``ogpsa_jax.projection`` (the optax transforms, flat and matrix, and their states),
``ogpsa_jax.bases`` (estimators of the capability subspace), ``ogpsa_jax.models`` (decoders,
HF/GGUF I/O, generation), ``ogpsa_jax.data`` (chat rendering, sources, batching),
``ogpsa_jax.train`` (SFT/DPO steps, loop, checkpoints), ``ogpsa_jax.eval`` (prompt sets, judges,
evaluators) and ``ogpsa_jax.experiment`` (reusable study pieces).
"""

__version__ = "0.1.0"

from ogpsa_jax.bases import (
    capability_basis,
    collect_inputs,
    matrix_basis_from_activations,
    matrix_basis_from_gradients,
    reference_gradients,
)
from ogpsa_jax.data import (
    Batches,
    PreferencePair,
    SFTExample,
    assets_path,
    load_preferences,
    load_sft,
    render_chat,
)
from ogpsa_jax.eval import (
    LMEvalAdapter,
    load_prompt_set,
    multiple_choice_accuracy,
    refusal_judge,
    refusal_rate,
)
from ogpsa_jax.models import (
    Decoder,
    DecoderConfig,
    LoRAConfig,
    LoRAParam,
    add_lora,
    generate,
    init_random,
    load_hf,
    load_peft,
    merge_lora,
    save_hf,
    save_peft,
    sequence_logprobs,
)
from ogpsa_jax.models.capture import CapturedInputs, capture_inputs
from ogpsa_jax.projection import (
    MatrixOGPSAState,
    OGPSAState,
    basis_nbytes,
    get_basis,
    ogpsa,
    ogpsa_adamw,
    ogpsa_matrix,
    ogpsa_matrix_adamw,
    project,
    project_matrix,
    residual_max,
    set_basis,
)
from ogpsa_jax.train import TrainConfig, dpo_loss

__all__ = [
    "Batches",
    "CapturedInputs",
    "Decoder",
    "DecoderConfig",
    "LMEvalAdapter",
    "LoRAConfig",
    "LoRAParam",
    "MatrixOGPSAState",
    "OGPSAState",
    "PreferencePair",
    "SFTExample",
    "TrainConfig",
    "add_lora",
    "assets_path",
    "basis_nbytes",
    "capability_basis",
    "capture_inputs",
    "collect_inputs",
    "dpo_loss",
    "generate",
    "get_basis",
    "init_random",
    "load_hf",
    "load_peft",
    "load_preferences",
    "load_prompt_set",
    "load_sft",
    "matrix_basis_from_activations",
    "matrix_basis_from_gradients",
    "merge_lora",
    "multiple_choice_accuracy",
    "ogpsa",
    "ogpsa_adamw",
    "ogpsa_matrix",
    "ogpsa_matrix_adamw",
    "project",
    "project_matrix",
    "reference_gradients",
    "refusal_judge",
    "refusal_rate",
    "render_chat",
    "residual_max",
    "save_hf",
    "save_peft",
    "sequence_logprobs",
    "set_basis",
]
