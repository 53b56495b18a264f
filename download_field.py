"""Cut a field from a CloudVolume into an h5 dataset (see docs/datasets.md)."""

from metroem.download import download_field_main

if __name__ == "__main__":
    download_field_main()
