/* open_forever PATH: opens PATH in a loop until killed. Prints "ready" once an
 * open succeeded, then one line per failed open ("fail ERRNO"), so a test can
 * see whether any trapped call returned after the supervisor was gone. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: open_forever PATH\n");
        return 2;
    }
    int ready = 0;
    for (;;) {
        int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            close(fd);
            if (!ready) {
                ready = 1;
                (void)!write(1, "ready\n", 6);
            }
            continue;
        }
        char line[64];
        int n = snprintf(line, sizeof line, "fail %s\n", strerror(errno));
        (void)!write(1, line, (size_t)n);
    }
}
