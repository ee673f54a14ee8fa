"""Model classes the plugin adds to SGLang (registered by `sgl_merge.runtime.hooks`)."""
