"""Code generation: the rewritten graph goes to Inductor (C++ on CPU, Triton on GPU).

zc's own kernels (custom ops with Triton and C++ bodies) live beside this module as the passes
that need them land; :mod:`zc.codegen.inductor` is how every graph reaches Inductor.
"""
