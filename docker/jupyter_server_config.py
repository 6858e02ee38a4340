"""Jupyter Server settings of the tokenmeter image (read by `jupyter lab` / `jupyter server`).

Refuses to start without a real token: the notebook server is a shell into the container.
Python 3.8 syntax (the image's interpreter); reads only environment variables.
"""

import os
import sys

MIN_TOKEN_CHARS = 16

c = get_config()  # noqa: F821  (injected by traitlets when it executes this file)

_token = os.environ.get("JUPYTER_TOKEN", "").strip()
if len(_token) < MIN_TOKEN_CHARS:
    # SystemExit, not an exception: traitlets logs and skips a config file that raises an
    # Exception, and the server would then start with its defaults.
    sys.stderr.write(
        "error: JUPYTER_TOKEN is empty or shorter than %d characters; refusing to start "
        "Jupyter. Set it, e.g. JUPYTER_TOKEN=$(python3 -c 'import secrets; "
        "print(secrets.token_hex(24))')\n" % MIN_TOKEN_CHARS)
    raise SystemExit(2)

c.IdentityProvider.token = _token
c.PasswordIdentityProvider.hashed_password = ""
c.PasswordIdentityProvider.allow_password_change = False

# Reached from the host through the published port; the token is the guard.
c.ServerApp.ip = "0.0.0.0"
c.ServerApp.port = int(os.environ.get("JUPYTER_PORT", "8888"))
c.ServerApp.port_retries = 0  # a taken port is an error, not a silent move to another
c.ServerApp.allow_remote_access = True
c.ServerApp.open_browser = False
c.ServerApp.allow_root = False
c.ServerApp.root_dir = os.environ.get("TOKENMETER_WORKSPACE", "/workspace")
c.ServerApp.allow_origin = ""
c.ServerApp.disable_check_xsrf = False
c.ServerApp.quit_button = False
