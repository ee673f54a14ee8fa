"""`sgl_kernel.mamba` CPU functions: linear-attention / Mamba layers are unsupported on CPU here."""

from sgl_kernel._stand_in import unsupported

causal_conv1d_fn_cpu = unsupported("mamba.causal_conv1d_fn_cpu", "linear attention (GDN/KDA/Mamba layers)")
causal_conv1d_update_cpu = unsupported("mamba.causal_conv1d_update_cpu", "linear attention (GDN/KDA/Mamba layers)")
chunk_gated_delta_rule_cpu = unsupported("mamba.chunk_gated_delta_rule_cpu", "linear attention (GDN/KDA/Mamba layers)")
