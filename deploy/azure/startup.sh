#!/bin/sh
# The App Service start command (Linux, Python 3.11): the cqrskit API, the FastAPI
# app of the `api` role served by gunicorn with uvicorn workers, configured by
# gunicorn.conf.py beside this file and CQRSKIT_* app settings.
set -eu
exec gunicorn --config "$(dirname "$0")/gunicorn.conf.py"
