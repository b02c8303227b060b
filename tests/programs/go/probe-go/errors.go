package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
)

// errnoNames holds the same names, in the same order, as the table in
// tests/programs/c/probe.c, so both flavours print the same error text.
var errnoNames = []struct {
	errno syscall.Errno
	name  string
}{
	{syscall.EPERM, "EPERM"}, {syscall.ENOENT, "ENOENT"}, {syscall.ESRCH, "ESRCH"},
	{syscall.EINTR, "EINTR"}, {syscall.EIO, "EIO"}, {syscall.ENXIO, "ENXIO"},
	{syscall.E2BIG, "E2BIG"}, {syscall.ENOEXEC, "ENOEXEC"}, {syscall.EBADF, "EBADF"},
	{syscall.ECHILD, "ECHILD"}, {syscall.EAGAIN, "EAGAIN"}, {syscall.ENOMEM, "ENOMEM"},
	{syscall.EACCES, "EACCES"}, {syscall.EFAULT, "EFAULT"}, {syscall.EBUSY, "EBUSY"},
	{syscall.EEXIST, "EEXIST"}, {syscall.EXDEV, "EXDEV"}, {syscall.ENODEV, "ENODEV"},
	{syscall.ENOTDIR, "ENOTDIR"}, {syscall.EISDIR, "EISDIR"}, {syscall.EINVAL, "EINVAL"},
	{syscall.ENFILE, "ENFILE"}, {syscall.EMFILE, "EMFILE"}, {syscall.ENOTTY, "ENOTTY"},
	{syscall.ETXTBSY, "ETXTBSY"}, {syscall.EFBIG, "EFBIG"}, {syscall.ENOSPC, "ENOSPC"},
	{syscall.ESPIPE, "ESPIPE"}, {syscall.EROFS, "EROFS"}, {syscall.EMLINK, "EMLINK"},
	{syscall.EPIPE, "EPIPE"}, {syscall.EDOM, "EDOM"}, {syscall.ERANGE, "ERANGE"},
	{syscall.EDEADLK, "EDEADLK"}, {syscall.ENAMETOOLONG, "ENAMETOOLONG"},
	{syscall.ENOLCK, "ENOLCK"}, {syscall.ENOSYS, "ENOSYS"}, {syscall.ENOTEMPTY, "ENOTEMPTY"},
	{syscall.ELOOP, "ELOOP"}, {syscall.ENOMSG, "ENOMSG"}, {syscall.ENODATA, "ENODATA"},
	{syscall.ETIME, "ETIME"}, {syscall.EPROTO, "EPROTO"}, {syscall.EBADMSG, "EBADMSG"},
	{syscall.EOVERFLOW, "EOVERFLOW"}, {syscall.EILSEQ, "EILSEQ"},
	{syscall.ENOTSOCK, "ENOTSOCK"}, {syscall.EDESTADDRREQ, "EDESTADDRREQ"},
	{syscall.EMSGSIZE, "EMSGSIZE"}, {syscall.EPROTOTYPE, "EPROTOTYPE"},
	{syscall.ENOPROTOOPT, "ENOPROTOOPT"}, {syscall.EPROTONOSUPPORT, "EPROTONOSUPPORT"},
	{syscall.ESOCKTNOSUPPORT, "ESOCKTNOSUPPORT"}, {syscall.EOPNOTSUPP, "EOPNOTSUPP"},
	{syscall.EPFNOSUPPORT, "EPFNOSUPPORT"}, {syscall.EAFNOSUPPORT, "EAFNOSUPPORT"},
	{syscall.EADDRINUSE, "EADDRINUSE"}, {syscall.EADDRNOTAVAIL, "EADDRNOTAVAIL"},
	{syscall.ENETDOWN, "ENETDOWN"}, {syscall.ENETUNREACH, "ENETUNREACH"},
	{syscall.ENETRESET, "ENETRESET"}, {syscall.ECONNABORTED, "ECONNABORTED"},
	{syscall.ECONNRESET, "ECONNRESET"}, {syscall.ENOBUFS, "ENOBUFS"},
	{syscall.EISCONN, "EISCONN"}, {syscall.ENOTCONN, "ENOTCONN"},
	{syscall.ESHUTDOWN, "ESHUTDOWN"}, {syscall.ETIMEDOUT, "ETIMEDOUT"},
	{syscall.ECONNREFUSED, "ECONNREFUSED"}, {syscall.EHOSTDOWN, "EHOSTDOWN"},
	{syscall.EHOSTUNREACH, "EHOSTUNREACH"}, {syscall.EALREADY, "EALREADY"},
	{syscall.EINPROGRESS, "EINPROGRESS"}, {syscall.ESTALE, "ESTALE"},
	{syscall.ECANCELED, "ECANCELED"},
}

// errorName maps err to the text the C flavour prints for the same failure.
func errorName(err error) string {
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		switch {
		case dnsErr.IsNotFound:
			return "EAI_NONAME"
		case dnsErr.IsTimeout, dnsErr.IsTemporary:
			return "EAI_AGAIN"
		default:
			return "EAI_FAIL"
		}
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return "ETIMEDOUT"
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		for _, entry := range errnoNames {
			if entry.errno == errno {
				return entry.name
			}
		}
		return fmt.Sprintf("errno %d", int(errno))
	}
	// Not errno-derived: keep the text so a failure is still debuggable.
	return err.Error()
}

// failProtocol is fail for HTTP: a failure that is not a system error is a
// malformed response, which the C flavour reports as EPROTO.
func failProtocol(err error) {
	var dnsErr *net.DNSError
	var errno syscall.Errno
	if errors.As(err, &dnsErr) || errors.As(err, &errno) || errors.Is(err, os.ErrDeadlineExceeded) {
		fail(err)
	}
	failText("EPROTO")
}

func fail(err error) {
	failText(errorName(err))
}

func failText(text string) {
	fmt.Printf("error: %s\n", text)
	os.Exit(1)
}
