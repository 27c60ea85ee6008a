"""One module per model family; each declares ``SPECS``, a tuple of `lmpress.arch.spec.Spec`.

A new family is one new module here: `lmpress.arch.registry` finds every module of this package.
"""
