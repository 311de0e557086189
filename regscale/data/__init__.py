"""ImageNet to MDS shards (prepare) and the resumable training stream."""

from regscale.data.streaming_core import use_streaming_core

use_streaming_core()
