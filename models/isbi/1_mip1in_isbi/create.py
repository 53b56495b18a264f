"""modelhouse / corgie entry point of a metroem module folder.

The folder is data: ``model/model_spec.json`` names the architecture (versioned in the metroem
package) and its settings, ``model/*.state.pth.tar`` hold the weights. ``create()`` returns a
corgie processor (torchfields output) unless ``output="tensor"``; processor params such as
``smoothing_nm`` / ``pixel_nm`` are passed on (see metroem.corgie).
Needs metroem installed (``pip install metroem``).
"""

import os


def create(checkpoint_name=None, device="cpu", output="torchfields", **params):
    """Build this folder's aligner; the other processor params go to metroem.corgie.create."""
    from metroem.corgie import create as create_module

    here = os.path.dirname(os.path.abspath(__file__))
    return create_module(here, checkpoint_name=checkpoint_name, device=device, output=output,
                         **params)
