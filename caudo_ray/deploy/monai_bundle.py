"""A run's final segmenter as a MONAI bundle that MONAI's own runner executes on a folder of images.

Layout::

    OUT/
      configs/metadata.json    label names, input and output spec, versions, the run's provenance
      configs/inference.json   LoadImage -> SegmenterInputd -> UNet -> SegmenterOutputd -> SaveImage
      models/model.pt          the UNet's state dict (plain tensors: MONAI loads it with weights_only=True)
      scripts/                 the two transforms around the network and the preprocessing they run
      docs/README.md           how to run it

Run it with ``python -m monai.bundle run --config_file OUT/configs/inference.json --bundle_root OUT
--dataset_dir IMAGES --output_dir MASKS``; it writes one mask per image, named as the image, as
``output_ext`` (default ``.png``; ``--output_ext .nii.gz`` for NIfTI input), the masks ``caudo-ray predict``
writes for the same images.
"""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version as package_version
from pathlib import Path

import monai
import numpy as np
import torch
from packaging.version import Version

from caudo_ray.deploy.segmenter import Segmenter
from caudo_ray.transforms.monai_io import bundle_script_files

BUNDLE_VERSION = "1.0.0"


def write_monai_bundle(segmenter: Segmenter, out: Path, name: str, provenance: dict) -> Path:
    """Write ``segmenter`` as a MONAI bundle into ``out`` (created; existing bundle files are replaced).

    Args:
        segmenter: the trained segmenter with its spec.
        out: the bundle's folder.
        name: the bundle's name (``tracking.model_name``).
        provenance: what to record of the run (validation Dice, exemplar ids, config hash, work dir).

    Returns:
        ``out``.
    """
    out = Path(out)
    for sub in ("configs", "models", "scripts", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in segmenter.net.state_dict().items()}, out / "models" / "model.pt")
    (out / "scripts" / "__init__.py").write_text('"""Transforms of the caudo-ray segmenter, copied from caudo-ray."""\n')
    for path in bundle_script_files():
        shutil.copyfile(path, out / "scripts" / path.name)
    (out / "configs" / "inference.json").write_text(json.dumps(inference_config(segmenter), indent=2) + "\n")
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata(segmenter, name, provenance), indent=2) + "\n")
    (out / "docs" / "README.md").write_text(_README.format(name=name))
    return out


def inference_config(segmenter: Segmenter) -> dict:
    """The bundle's ``configs/inference.json``: a SupervisedEvaluator over every file of ``dataset_dir``."""
    spec = segmenter.spec
    return {
        "imports": ["$import glob", "$import os", "$import numpy as np", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "dataset_dir": "$@bundle_root + '/images'",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".png",
        "working_size": list(spec.working_size),
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@dataset_dir, '*'))) "
        "if os.path.isfile(f) and not os.path.basename(f).startswith('.')]",
        "network_def": {
            "_target_": "UNet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": spec.num_classes,
            "channels": list(spec.channels),
            "strides": list(spec.strides),
            "num_res_units": spec.num_res_units,
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "scripts.monai_io.SegmenterInputd", "keys": "image", "working_size": "@working_size"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "scripts.monai_io.SegmenterOutputd", "keys": "pred", "image_key": "image"},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "",
                    "output_ext": "@output_ext",
                    "output_dtype": "$np.uint8",
                    "separate_folder": False,
                    "resample": False,
                    "print_log": False,
                },
            ],
        },
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'", "load_dict": {"model": "@network"}},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
        },
        "run": ["$@evaluator.run()"],
    }


def metadata(segmenter: Segmenter, name: str, provenance: dict) -> dict:
    """The bundle's ``configs/metadata.json``: MONAI's metadata fields, the label names and the input spec."""
    spec = segmenter.spec
    labels = {str(i): n for i, n in enumerate(spec.label_names)}
    return {
        "name": name,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: "exported by caudo-ray export-model"},
        "monai_version": monai.__version__,
        "pytorch_version": Version(torch.__version__).public,
        "numpy_version": np.__version__,
        "required_packages_version": {"pillow": package_version("pillow"), "nibabel": package_version("nibabel")},
        "task": "2D segmentation, trained from one labelled exemplar by caudo-ray (diffusion-calibrated self-training)",
        "description": (
            "A MONAI UNet with its preprocessing: each image (PNG, JPEG, NIfTI or DICOM; one channel, colour is "
            "reduced to luminance; any size and intensity range) is scaled to [0, 1] between its 1st and 99th "
            f"percentiles and resized to {spec.working_size[0]}x{spec.working_size[1]}; the class map is resized "
            "back to the image's size."
        ),
        "authors": "caudo-ray",
        "copyright": "the run's owner",
        "data_type": "2D images",
        "image_classes": "one channel, any size and intensity range",
        "label_classes": labels,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "any",
                    "num_channels": 1,
                    "spatial_shape": list(spec.working_size),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": spec.num_classes,
                    "spatial_shape": list(spec.working_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": labels,
                }
            },
        },
        "caudo_ray": {**provenance, "segmenter": spec.to_dict()},
    }


_README = """# {name}: a caudo-ray segmenter as a MONAI bundle

Segment every image of a folder (PNG, JPEG, NIfTI or DICOM, 2D), writing one class map per image, named as the
image:

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --dataset_dir /path/to/images --output_dir /path/to/masks      # --output_ext .nii.gz for NIfTI input
```

Images of any size and intensity range go in as they are: `scripts/monai_io.py` scales and resizes them as the
segmenter was trained and brings each class map back to its image's size. `configs/metadata.json` names the
classes (`label_classes`) and records the run the model came from (`caudo_ray`).
"""
