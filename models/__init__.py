"""The shipped pyramids, installed with metroem as the data package ``metroem_models``.

pyproject.toml maps this folder to that package, so ``metroem.pretrained`` finds the pyramids
in a source checkout, an editable install and a wheel alike. See models/README.md.
"""
