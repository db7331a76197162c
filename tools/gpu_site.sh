# Sourced by the GPU scripts on the GPU machine: puts the packages staged by tools/gpu_stage.sh (the carried .whl/)
# on PYTHONPATH, with the package under src/. .whl/site.tar.xz is the wheels unpacked and packed with xz (2 MB against
# 6.5 MB of wheels: the 64 MiB transfer then holds both text-to-image fixtures); loose wheels are pip-installed.
if ! PYTHONPATH=/tmp/site python3 -c "import diffusers" 2>/dev/null; then
  rm -rf /tmp/site && mkdir -p /tmp/site
  if [ -f .whl/site.tar.xz ]; then
    tar xJf .whl/site.tar.xz -C /tmp/site
  else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  fi
fi
export PYTHONPATH=/tmp/site:$PWD/src
