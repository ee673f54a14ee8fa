"""The sgl-merge extension of the SGLang runtime, installed through SGLang's plugin mechanism."""
