"""What tests share: builders of configs, models, shards, exports and runs. Test modules import
from here (and get fixtures from conftest.py), never from one another."""
