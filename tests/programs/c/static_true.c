/* static-true: does nothing; built with gcc -static for startup benchmarks. */
int main(void)
{
    return 0;
}
