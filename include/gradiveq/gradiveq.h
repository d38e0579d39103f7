// Umbrella header: the whole public C++ API of GradiVeQ (without the deprecated aggregator.h and
// qsgd_aggregator.h).
#pragma once

#include "gradiveq/bucket_aggregator.h"
#include "gradiveq/comm_hook.h"
#include "gradiveq/casq.h"
#include "gradiveq/co3.h"
#include "gradiveq/conv_layout.h"
#include "gradiveq/errors.h"
#include "gradiveq/gather_aggregator.h"
#include "gradiveq/gradiveq_aggregator.h"
#include "gradiveq/message_codec.h"
#include "gradiveq/options.h"
#include "gradiveq/gradient_synchronizer.h"
#include "gradiveq/pca_compressor.h"
#include "gradiveq/process_group.h"
#include "gradiveq/qsgd.h"
#include "gradiveq/schedule.h"
#include "gradiveq/types.h"
#include "gradiveq/version.h"
