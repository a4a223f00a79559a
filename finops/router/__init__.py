"""Request router: train a tier classifier on logged traffic, calibrate, evaluate, export.

`finops.router.artifact.load_router(path)` is what the routing shim uses; everything
else here builds and judges the artifact it loads.
"""
