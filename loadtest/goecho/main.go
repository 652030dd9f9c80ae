// Command goecho is a fast gRPC echo server for the data-plane benchmark.
//
// It answers every method, known or not, through grpc.UnknownServiceHandler and a
// pass-through codec: each request message is sent back as it arrived, byte for byte, without
// any protobuf decoding. So /echo.Echo/UnaryEcho (see protos/echo.proto) works for ghz and for
// h2load alike, and so does any other path. Streams are echoed message by message.
//
// It serves cleartext HTTP/2 (h2c) unless -tls-cert and -tls-key are given; then it serves
// TLS 1.3 only, with ALPN h2 (grpc-go's credentials add it), and logs each distinct outcome of
// a handshake (version, cipher suite, ALPN, resumed or not) the first time it sees it, so that
// a benchmark can check what its connections really negotiated.
package main

import (
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"runtime"
	"sync"
	"syscall"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/mem"
)

const maxMessageSize = 256 << 20 // 256 MiB

// rawMessage holds one gRPC message as the transport delivered it.
type rawMessage struct {
	data mem.BufferSlice
}

// rawCodec moves message bytes in and out without copying or decoding them. Unmarshal takes a
// reference on the received buffers; Marshal hands that reference back to the transport, which
// releases it once the bytes are written.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	msg, ok := v.(*rawMessage)
	if !ok {
		return nil, errors.New("goecho: codec only handles raw messages")
	}
	data := msg.data
	msg.data = nil
	return data, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	msg, ok := v.(*rawMessage)
	if !ok {
		return errors.New("goecho: codec only handles raw messages")
	}
	data.Ref()
	msg.data = data
	return nil
}

// Name is "proto" so that the codec stands in for the default one.
func (rawCodec) Name() string { return "proto" }

// echo sends back every message of the stream until the client half-closes.
func echo(_ any, stream grpc.ServerStream) error {
	for {
		msg := &rawMessage{}
		if err := stream.RecvMsg(msg); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := stream.SendMsg(msg); err != nil {
			msg.data.Free()
			return err
		}
	}
}

// handshakeLog remembers which handshake outcomes were already logged: one line per kind, not
// per connection, so that a benchmark of new connections does not measure the logger.
type handshakeLog struct {
	seen sync.Map
}

func (h *handshakeLog) verify(state tls.ConnectionState) error {
	kind := fmt.Sprintf("%s %s alpn=%s resumed=%t", tls.VersionName(state.Version),
		tls.CipherSuiteName(state.CipherSuite), state.NegotiatedProtocol, state.DidResume)
	if _, logged := h.seen.LoadOrStore(kind, true); !logged {
		log.Printf("goecho: tls handshake: %s", kind)
	}
	return nil
}

// tlsOption is the server option for TLS with this certificate and key. TLS 1.3 only: crypto/tls
// ignores CipherSuites for 1.3 and picks TLS_AES_128_GCM_SHA256 first on AES hardware, so every
// client that offers it lands on that suite, whatever its own preference order.
func tlsOption(certFile, keyFile string) (grpc.ServerOption, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	handshakes := &handshakeLog{}
	config := &tls.Config{
		Certificates:     []tls.Certificate{cert},
		MinVersion:       tls.VersionTLS13,
		VerifyConnection: handshakes.verify,
	}
	return grpc.Creds(credentials.NewTLS(config)), nil
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "host:port to listen on")
	certFile := flag.String("tls-cert", "", "serve TLS with this certificate (PEM; needs -tls-key)")
	keyFile := flag.String("tls-key", "", "private key of -tls-cert (PEM)")
	flag.Parse()

	options := []grpc.ServerOption{
		grpc.ForceServerCodecV2(rawCodec{}),
		grpc.UnknownServiceHandler(echo),
		grpc.MaxRecvMsgSize(maxMessageSize),
		grpc.MaxSendMsgSize(maxMessageSize),
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
	}
	serving := "serving"
	if (*certFile == "") != (*keyFile == "") {
		log.Fatalf("goecho: -tls-cert and -tls-key go together")
	}
	if *certFile != "" {
		option, err := tlsOption(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("goecho: TLS: %v", err)
		}
		options = append(options, option)
		serving = "serving TLS"
	}

	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("goecho: listen %s: %v", *addr, err)
	}
	server := grpc.NewServer(options...)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-stop
		server.Stop()
	}()

	log.Printf("goecho: %s on %s", serving, lis.Addr())
	if err := server.Serve(lis); err != nil {
		log.Fatalf("goecho: serve: %v", err)
	}
}
