"""modelhouse / corgie entry point of a metroem module folder.

The folder is data: ``model/model_spec.json`` names the architecture (versioned in the metroem
package) and its settings, ``model/*.state.pth.tar`` hold the weights. ``create()`` returns a
corgie processor (torchfields output) unless ``output="tensor"``; see metroem.corgie.
Needs metroem installed (``pip install metroem``).
"""

import os


def create(checkpoint_name=None, device="cpu", output="torchfields", **kwargs):
    """Build this folder's aligner; corgie's other processor params are ignored."""
    from metroem.corgie import create as create_module

    here = os.path.dirname(os.path.abspath(__file__))
    return create_module(here, checkpoint_name=checkpoint_name, device=device, output=output)
