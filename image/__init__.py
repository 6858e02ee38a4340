"""The tokenmeter container image: engine detection, base images and the project layer.

`invoke build` / `python -m image build` drive it. It shells out to a container engine
(Docker or podman) and debootstrap; it never imports the pipeline or the endpoint.
"""
