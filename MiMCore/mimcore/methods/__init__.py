"""Self-supervised pre-training methods (METHODS.md): MiM (``mim``), MAE (``mae``), SimMIM
(``simmim``) and GMIM (``gmim``). :mod:`mimcore.methods.registry` lists them with their
backbones and builds the model a run trains. Nothing is imported here, so that reading the
registry's names stays cheap.
"""
