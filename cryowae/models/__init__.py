"""Neural networks: the WAE restorer (the latent discriminator lives in divergences)."""

from cryowae.models.restorer import Encoding, RestorerConfig, RestorerOutput, WAERestorer

__all__ = ["Encoding", "RestorerConfig", "RestorerOutput", "WAERestorer"]
