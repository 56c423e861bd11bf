"""ogpsa_jax: Orthogonal Gradient Projection for Safety Alignment, in JAX.

Public names are re-exported here; everything else is private to its module.
"""

__version__ = "0.1.0"

from ogpsa_jax.basis import capability_basis, reference_gradients  # noqa: E402, F401
from ogpsa_jax.transform import (  # noqa: E402, F401
    OGPSAState,
    get_basis,
    ogpsa,
    ogpsa_adamw,
    project,
    set_basis,
)
from ogpsa_jax.data import (  # noqa: E402, F401
    Batches,
    PreferencePair,
    SFTExample,
    assets_path,
    load_preferences,
    load_sft,
    render_chat,
)
from ogpsa_jax.matrix import MatrixOGPSAState, basis_nbytes, ogpsa_matrix  # noqa: E402, F401
from ogpsa_jax.matrix_basis import (  # noqa: E402, F401
    collect_inputs,
    matrix_basis_from_activations,
    matrix_basis_from_gradients,
)
from ogpsa_jax.eval import (  # noqa: E402, F401
    LMEvalAdapter,
    load_prompt_set,
    multiple_choice_accuracy,
    refusal_judge,
    refusal_rate,
)
from ogpsa_jax.models import (  # noqa: E402, F401
    Decoder,
    DecoderConfig,
    generate,
    init_random,
    load_hf,
    save_hf,
    sequence_logprobs,
)
from ogpsa_jax.train import TrainConfig, dpo_loss  # noqa: E402, F401
from ogpsa_jax.models.capture import CapturedInputs, capture_inputs  # noqa: E402, F401
