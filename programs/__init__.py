"""Real SGLang programs that use sgl-merge: maths, code, multi-step web research."""
