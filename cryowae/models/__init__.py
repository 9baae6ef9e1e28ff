"""Neural networks: the WAE restorer (the latent discriminator lives in divergences)."""

from cryowae.models.restorer import RestorerConfig, WAERestorer

__all__ = ["RestorerConfig", "WAERestorer"]
