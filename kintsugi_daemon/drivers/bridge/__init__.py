"""The instrument bridge: a `DualBeam` over OpenFIBSEM (and AutoScript where OpenFIBSEM has no verb).

Runs on the microscope's PC (`kintsugi bridge`), served by the same `drivers.server.build_app` as the
simulator. The daemon never imports this package: it reaches the bridge over the instrument API.
`fibsem` (the `[bridge]` extra) is imported only when a backend is opened.
"""
