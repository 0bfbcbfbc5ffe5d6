"""The built-in stage kinds, one package each (prune, distill, quantize, evaluate, generate). Nothing here lists
them: compressor.contract's registry imports every package in this directory on its first read. A kind implements
the contract of compressor/contract/kind.py and registers itself: `KIND = register(Prune())`."""
