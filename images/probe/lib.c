/* Freestanding helpers: the memory and string functions gcc may call, numbers, printf. */
#include "probe.h"

void *memset(void *destination, int value, size_t count)
{
    uint8_t *bytes = destination;
    /* rep stosb is one emulated instruction instead of a loop of stores. */
    __asm__ __volatile__("rep stosb"
                         : "+D"(bytes), "+c"(count)
                         : "a"(value)
                         : "memory");
    return destination;
}

void *memcpy(void *destination, const void *source, size_t count)
{
    void *cursor = destination;
    __asm__ __volatile__("rep movsb"
                         : "+D"(cursor), "+S"(source), "+c"(count)
                         :
                         : "memory");
    return destination;
}

int memcmp(const void *left, const void *right, size_t count)
{
    const uint8_t *a = left;
    const uint8_t *b = right;
    for (size_t i = 0; i < count; i++) {
        if (a[i] != b[i])
            return a[i] - b[i];
    }
    return 0;
}

size_t strlen(const char *text)
{
    size_t length = 0;
    while (text[length])
        length++;
    return length;
}

int strcmp(const char *left, const char *right)
{
    while (*left && *left == *right) {
        left++;
        right++;
    }
    return (uint8_t)*left - (uint8_t)*right;
}

int strncmp(const char *left, const char *right, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        if (left[i] != right[i] || !left[i])
            return (uint8_t)left[i] - (uint8_t)right[i];
    }
    return 0;
}

static int digit_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Parse a whole decimal or 0x-prefixed hexadecimal number; reject empty text and overflow. */
bool parse_u64(const char *text, uint64_t *value)
{
    unsigned base = 10;
    uint64_t result = 0;
    if (text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
        base = 16;
        text += 2;
    }
    if (!*text)
        return false;
    for (; *text; text++) {
        int digit = digit_value(*text);
        if (digit < 0 || (unsigned)digit >= base)
            return false;
        if (result > (UINT64_MAX - (uint64_t)digit) / base)
            return false;
        result = result * base + (uint64_t)digit;
    }
    *value = result;
    return true;
}

struct sink {
    char *buffer;
    size_t size;
    size_t length;
};

static void put(struct sink *sink, char c)
{
    if (sink->length + 1 < sink->size)
        sink->buffer[sink->length] = c;
    sink->length++;
}

static void put_number(struct sink *sink, uint64_t value, unsigned base, int width, char pad,
                       bool negative)
{
    char digits[24];
    int count = 0;
    do {
        digits[count++] = "0123456789abcdef"[value % base];
        value /= base;
    } while (value);
    if (negative)
        width--;
    if (negative && pad == '0')
        put(sink, '-');
    for (int i = count; i < width; i++)
        put(sink, pad);
    if (negative && pad != '0')
        put(sink, '-');
    while (count)
        put(sink, digits[--count]);
}

static uint64_t take_unsigned(va_list *arguments, int longs)
{
    if (longs)
        return va_arg(*arguments, uint64_t);
    return va_arg(*arguments, unsigned int);
}

static int64_t take_signed(va_list *arguments, int longs)
{
    if (longs)
        return va_arg(*arguments, int64_t);
    return va_arg(*arguments, int);
}

/* Format a subset of printf: %s %c %d %u %x %p %%, flag 0, a width, and l, ll or z. */
int kvsnprintf(char *buffer, size_t size, const char *format, va_list arguments)
{
    struct sink sink = {buffer, size, 0};
    va_list list;
    va_copy(list, arguments);
    for (; *format; format++) {
        if (*format != '%') {
            put(&sink, *format);
            continue;
        }
        format++;
        char pad = ' ';
        int width = 0;
        int longs = 0;
        if (*format == '0') {
            pad = '0';
            format++;
        }
        while (*format >= '0' && *format <= '9')
            width = width * 10 + (*format++ - '0');
        while (*format == 'l' || *format == 'z') {
            longs++;
            format++;
        }
        switch (*format) {
        case 's': {
            const char *text = va_arg(list, const char *);
            size_t length = strlen(text);
            for (size_t i = length; i < (size_t)width; i++)
                put(&sink, ' ');
            while (*text)
                put(&sink, *text++);
            break;
        }
        case 'c':
            put(&sink, (char)va_arg(list, int));
            break;
        case 'd': {
            int64_t value = take_signed(&list, longs);
            uint64_t magnitude = value < 0 ? (uint64_t)0 - (uint64_t)value : (uint64_t)value;
            put_number(&sink, magnitude, 10, width, pad, value < 0);
            break;
        }
        case 'u':
            put_number(&sink, take_unsigned(&list, longs), 10, width, pad, false);
            break;
        case 'x':
            put_number(&sink, take_unsigned(&list, longs), 16, width, pad, false);
            break;
        case 'p':
            put(&sink, '0');
            put(&sink, 'x');
            put_number(&sink, (uint64_t)va_arg(list, void *), 16, width, pad, false);
            break;
        case '%':
            put(&sink, '%');
            break;
        default:
            put(&sink, '%');
            put(&sink, *format ? *format : '?');
            if (!*format)
                format--;
        }
    }
    va_end(list);
    if (size)
        buffer[sink.length < size ? sink.length : size - 1] = '\0';
    return (int)sink.length;
}

void kprintf(const char *format, ...)
{
    char buffer[512];
    va_list arguments;
    va_start(arguments, format);
    int length = kvsnprintf(buffer, sizeof buffer, format, arguments);
    va_end(arguments);
    if (length > (int)sizeof buffer - 1)
        length = sizeof buffer - 1;
    console_write(buffer, (size_t)length);
}

/* Print `data` as lowercase hex, `per_line` bytes to a line. */
void print_hex_lines(const uint8_t *data, size_t length, size_t per_line)
{
    char line[2 * 64 + 1];
    if (per_line > 64)
        per_line = 64;
    for (size_t start = 0; start < length; start += per_line) {
        size_t count = length - start < per_line ? length - start : per_line;
        for (size_t i = 0; i < count; i++) {
            line[2 * i] = "0123456789abcdef"[data[start + i] >> 4];
            line[2 * i + 1] = "0123456789abcdef"[data[start + i] & 0xf];
        }
        line[2 * count] = '\n';
        console_write(line, 2 * count + 1);
    }
}
