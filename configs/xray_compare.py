"""The study's comparison in one go, LightLayers K=1..5, Conv2D and the transfer row:
python launch.py --experiment=xray_compare"""

from configs import _training


def get_config():
    c = _training.get_config("xray_compare", "xray_light")
    c.model.channels = 3
    c.model.se_ratio = 0.0  # squeeze-and-excitation on the LightLayers and Conv2D rows (0: off)
    c.model.ks = "1,2,3,4,5"  # LightLayers ranks of the rows
    c.transfer = _training.transfer_section(backbone="inception_v3")  # 'none': no transfer row
    c.runtime.concurrent_rows = 2  # rows trained at a time (experiments/concurrent_rows.py; docs/speed.md)
    c.runtime.checkpoint_every = 0  # each row at its end: an interrupted row restarts (docs/reliability.md)
    return c
