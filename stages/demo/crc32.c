/* crc32: prints the CRC-32 (IEEE 802.3) of each file, like a tiny cksum. */
#include <stdint.h>
#include <stdio.h>

static uint32_t crc32_update(uint32_t crc, const unsigned char *data, size_t length)
{
    crc = ~crc;
    while (length--) {
        crc ^= *data++;
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (0xEDB88320u & (uint32_t)-(int32_t)(crc & 1));
    }
    return ~crc;
}

int main(int argc, char **argv)
{
    int status = 0;
    for (int i = 1; i < argc; i++) {
        FILE *file = fopen(argv[i], "rb");
        if (!file) {
            perror(argv[i]);
            status = 1;
            continue;
        }
        unsigned char buffer[65536];
        size_t count;
        uint32_t crc = 0;
        while ((count = fread(buffer, 1, sizeof buffer, file)) > 0)
            crc = crc32_update(crc, buffer, count);
        fclose(file);
        printf("%08x  %s\n", crc, argv[i]);
    }
    return status;
}
