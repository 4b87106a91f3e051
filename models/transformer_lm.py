"""The softmax-attention baselines of the TransNormerLLM comparison: plain pre-LN transformer LMs.

A baseline is MatFormer's MatLM (`models.matformer`) at full width: causal softmax attention with
RoPE, LayerNorm, an exact-GELU FFN, biases, a tied embedding. It is built with TransNormerLLM's
vocabulary, width and depth and a d_ff that gives it the TNL variant's parameter count
(`transformer_lm_tiny`: the dims of `matlm_tiny`), so that the two differ in the token mixer
alone (`configs/matformer.py:lm_tiny_shakespeare` and `configs/transnormer.py:tiny_shakespeare`
train the tiny pair with one recipe). Their family is "matformer": the builder is MatLM, and
`models.convert` looks for its converter there.
"""
from models.matformer import MatLM
from models.registry import register_model

# --- variants -------------------------------------------------------------------------------------
# Named configs: the TransNormerLLM variant each one matches, its vocabulary, width and depth.

_CFGS = {
    "transformer_lm_tiny": dict(vocab_size=256, dim=128, depth=4, num_heads=4, mlp_dim=584),
    "transformer_lm_385m": dict(vocab_size=64000, dim=1024, depth=24, num_heads=8, mlp_dim=4728),
    "transformer_lm_1b": dict(vocab_size=64000, dim=2048, depth=16, num_heads=16, mlp_dim=9464),
}

# --- registrations: the TNL paper's Transformer of the same size ----------------------------------

register_model("transformer_lm_tiny", MatLM, family="matformer",
               paper_metric="baseline of transnormer_llm_tiny", **_CFGS["transformer_lm_tiny"])
register_model("transformer_lm_385m", MatLM, family="matformer",
               paper_metric="TNL paper's Transformer at 385M: loss 2.362 / PPL 5.160",
               **_CFGS["transformer_lm_385m"])
register_model("transformer_lm_1b", MatLM, family="matformer",
               paper_metric="TNL paper's Transformer at 1B: loss 2.061 / PPL 4.765",
               **_CFGS["transformer_lm_1b"])
