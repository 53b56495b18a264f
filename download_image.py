"""Cut image pairs from a CloudVolume into an h5 dataset (see docs/datasets.md)."""

from metroem.download import download_image_main

if __name__ == "__main__":
    download_image_main()
