"""APS-I (independent sharing) on the digits ResNet; see configs/aps_cnn.py."""
from configs import aps_cnn


def get_config():
    return aps_cnn.get_config("independent")
