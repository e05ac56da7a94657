"""The one compiled module: moco_xla.data._jpeg_region, a rectangle of a JPEG decoded by the
system's libjpeg-turbo (Debian: libjpeg62-turbo-dev; needs a C compiler). Optional: where it does
not build, the install goes on and CropViews decodes whole images (simplejpeg), the same views
at more CPU. Everything else about the package is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("moco_xla.data._jpeg_region", sources=["moco_xla/data/_jpeg_region.c"],
                             libraries=["jpeg"], optional=True)])
