"""Public datasets: manifests of tomograms a user may restore, their verification and
download (`cryowae data verify|fetch`).

`cryowae.data.manifest` loads and validates manifests, `cryowae.data.verify` checks local
copies;
`cryowae.data.fetch` downloads (import its `fetch` function from there: the package
does not re-export it, so that ``cryowae.data.fetch`` stays the module).
"""

from cryowae.data.manifest import Manifest, ManifestEntry, load_manifest, parse_manifest
from cryowae.data.verify import VerifyResult, sha256_file, verify

__all__ = [
    "Manifest", "ManifestEntry", "VerifyResult", "load_manifest", "parse_manifest",
    "sha256_file", "verify",
]
