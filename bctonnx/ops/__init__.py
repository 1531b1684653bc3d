"""bctonnx's integer ops: numpy references (the specification) and the native library sources.

Every op in the ``bctonnx`` domain (version 1) has one numpy reference here; the C++ kernel in
``csrc/`` must be bit-exact with it. Block convention: see ``csrc/common.h``.
"""
