// Intel ISA-L: erasure codes (Reed-Solomon over GF(2^8)) and CRCs.
#include <isa-l/erasure_code.h>
#include <isa-l/crc.h>
#include <isa-l/crc64.h>
